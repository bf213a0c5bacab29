from twisted.application.service import ServiceMaker

relayd = ServiceMaker("relayd", "relayd.tap", "An authenticated SMTP submission relay with a durable queue.", "relayd")
