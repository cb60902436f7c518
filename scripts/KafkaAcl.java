// Grants a Kafka ACL, for the tests: run by `scripts/kafka.sh acl` with
// the broker's own client libraries on the classpath (a Java single-file
// program).
//
//   java -cp 'KAFKA_HOME/lib/*' KafkaAcl.java BOOTSTRAP USER PASSWORD PRINCIPAL OPERATION TOPIC
//
// logs in over SASL/PLAIN as USER and allows PRINCIPAL (User:name) the
// OPERATION (WRITE, READ, DESCRIBE, ...) on the topic TOPIC ("*": all).
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class KafkaAcl {
    public static void main(String[] a) throws Exception {
        if (a.length != 6) {
            System.err.println("usage: KafkaAcl BOOTSTRAP USER PASSWORD PRINCIPAL OPERATION TOPIC");
            System.exit(2);
        }
        Properties p = new Properties();
        p.put("bootstrap.servers", a[0]);
        p.put("security.protocol", "SASL_PLAINTEXT");
        p.put("sasl.mechanism", "PLAIN");
        p.put("sasl.jaas.config", "org.apache.kafka.common.security.plain.PlainLoginModule required username=\""
                + a[1] + "\" password=\"" + a[2] + "\";");
        try (Admin admin = Admin.create(p)) {
            AclBinding binding = new AclBinding(
                    new ResourcePattern(ResourceType.TOPIC, a[5], PatternType.LITERAL),
                    new AccessControlEntry(a[3], "*", AclOperation.fromString(a[4]), AclPermissionType.ALLOW));
            admin.createAcls(List.of(binding)).all().get();
        }
    }
}
